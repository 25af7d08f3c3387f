// The plain max / min forward checks w as it packs it: the finiteness scan before the call
// reads x alone.
//
// Why: the NaN-free forward of a max / min op runs only on finite data, so each call scanned x
// and w before it started, then packed w again into its kernel panels. On a dense layer w is
// the large operand (1024 x 1024: a 4 MiB read of L3 that the tiles cannot hide, 2-4% of the
// forward on Zen 4, one thread); the packing (pack_panel) already loads every weight, and
// checks it in passing. A call whose packing met a NaN or an infinity runs again on the
// NaN-propagating loop, which overwrites every output: the results are the scanned call's bits,
// and only a call with a non-finite weight pays twice.
//
// Part of the kernel template: included by kernels.inc inside its anonymous namespace (once
// per instruction set), after kernel_forward.h, never on its own.
#pragma once

// Whether the finiteness scan of a max / min call may leave w to the forward's packing: the
// plain forward (no winner record, no backward) of a NaN-free max / min op that packs every
// weight (forward_packed; the depthwise loop reads w unpacked). Sums keep the scan: their
// packing checks nothing (a user sum's fast combine, a clip say, may drop a NaN).
template <class Op>
bool w_checked_in_pack(const Ctx& c, bool backward) {
  return Op::kNanFree && Op::kReduce != 0 && !backward && !c.call->rec && !depthwise(c);
}

// The forward of a call whose scan found x (and the pad value) finite: the NaN-free loop, and
// the NaN-propagating one after it when the packing met a non-finite weight.
template <class Op>
void forward_checking_w(Ctx& c) {
  forward<Op, false>(c);
  if (!c.w_nonfinite || c.failed) return;
  c.safe = true;
  c.finite = false;
  forward<Op, true>(c);
}
