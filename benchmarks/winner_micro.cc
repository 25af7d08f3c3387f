// Microbenchmark behind csrc/kernel_winner.h's choice of a rescan over a winner index recorded
// by the forward: the inner loops of one packed 64-tap panel (AVX-512, one thread, values in
// L1), in picoseconds per output vector and tap (best of 7):
//   fwd        the forward (x + w on the FMA ports, max)
//   scan Rr    the backward's scan, r output rows (compare with y, masked add of the tap
//              number), x + w on the FMA ports; madd / mfma / alt: the masked add on the add
//              ports / as a masked FMA / alternating; icmp / iadd: integer compare / add
//   s3         x + w on the add ports ("add") or alternating between the FMA and the add
//              ports ("alt": csrc/kernel_winner.h's choice); PIN: w kept in registers
//   argmax+ties  a forward also keeping the first (>) and last (>=) maximal tap: what
//              identifying a winner with ties split needs
//   argmax-first the first maximal tap only (ties ignored: tropical-gemm's rule)
//   kfwd/kscan   the same for max_min / min_max's integer keys
// Build and run (no dependency of the package):
//   g++ -O3 -mavx512f -mavx512dq -mavx512bw -mavx512vl -mfma -ffp-contract=off \
//       benchmarks/winner_micro.cc -o /tmp/winner_micro && /tmp/winner_micro
#include <immintrin.h>
#include <cstdio>
#include <ctime>
#include <cstdlib>
typedef __m512 V; typedef __mmask16 M;
static inline V addf(V a, V b){ return _mm512_fmadd_ps(a,_mm512_set1_ps(1.f),b);}
constexpr int NV=4; constexpr int NR=64;
alignas(64) float wp[64*NR]; alignas(64) float xs[8][64]; alignas(64) float ys[8*NR]; alignas(64) float out[8*NR*3];
double now(){timespec t; clock_gettime(CLOCK_THREAD_CPUTIME_ID,&t); return t.tv_sec+t.tv_nsec*1e-9;}
// plain forward: MR rows
template<int R> __attribute__((noinline)) void fwd(int n){
  V acc[R][NV]; for(int r=0;r<R;++r)for(int v=0;v<NV;++v)acc[r][v]=_mm512_set1_ps(-1e30f);
  for(int i=0;i<n;++i){V wv[NV]; for(int v=0;v<NV;++v) wv[v]=_mm512_load_ps(wp+i*NR+v*16);
    for(int r=0;r<R;++r){V x=_mm512_set1_ps(xs[r][i]); for(int v=0;v<NV;++v) acc[r][v]=_mm512_max_ps(acc[r][v], addf(x,wv[v]));}}
  for(int r=0;r<R;++r)for(int v=0;v<NV;++v)_mm512_store_ps(out+(r*NV+v)*16,acc[r][v]);
}
// scan: mode 0 = masked add (FADD), 1 = mask3 fma, 2 = alternate
template<int R,int MODE> __attribute__((noinline)) void scan(int n){
  V acc[R][NV], yv[R][NV]; for(int r=0;r<R;++r)for(int v=0;v<NV;++v){acc[r][v]=_mm512_setzero_ps(); yv[r][v]=_mm512_load_ps(ys+(r*NV+v)*16);}
  V kv=_mm512_set1_ps(4096.f), one=_mm512_set1_ps(1.f);
  for(int i=0;i<n;++i){V wv[NV]; for(int v=0;v<NV;++v) wv[v]=_mm512_load_ps(wp+i*NR+v*16);
    for(int r=0;r<R;++r){V x=_mm512_set1_ps(xs[r][i]); for(int v=0;v<NV;++v){ V c=addf(x,wv[v]); M e=_mm512_cmp_ps_mask(c,yv[r][v],_CMP_EQ_OQ);
      bool f = MODE==1 || (MODE==2 && ((r*NV+v)&1));
      if(f) acc[r][v]=_mm512_mask3_fmadd_ps(kv,one,acc[r][v],e); else acc[r][v]=_mm512_mask_add_ps(acc[r][v],e,acc[r][v],kv);}}
    kv=_mm512_add_ps(kv,one);}
  for(int r=0;r<R;++r)for(int v=0;v<NV;++v)_mm512_store_ps(out+(r*NV+v)*16,acc[r][v]);
}
// argmax forward with ties: best, first (gt), last (ge)
template<int R> __attribute__((noinline)) void argf(int n){
  V b[R][NV], f[R][NV], l[R][NV]; for(int r=0;r<R;++r)for(int v=0;v<NV;++v){b[r][v]=_mm512_set1_ps(-1e30f); f[r][v]=l[r][v]=_mm512_setzero_ps();}
  V kv=_mm512_set1_ps(0.f), one=_mm512_set1_ps(1.f);
  for(int i=0;i<n;++i){V wv[NV]; for(int v=0;v<NV;++v) wv[v]=_mm512_load_ps(wp+i*NR+v*16);
    for(int r=0;r<R;++r){V x=_mm512_set1_ps(xs[r][i]); for(int v=0;v<NV;++v){ V c=addf(x,wv[v]);
      M ge=_mm512_cmp_ps_mask(c,b[r][v],_CMP_GE_OQ), gt=_mm512_cmp_ps_mask(c,b[r][v],_CMP_GT_OQ);
      b[r][v]=_mm512_mask_mov_ps(b[r][v],ge,c); l[r][v]=_mm512_mask_mov_ps(l[r][v],ge,kv); f[r][v]=_mm512_mask_mov_ps(f[r][v],gt,kv);}}
    kv=_mm512_add_ps(kv,one);}
  for(int r=0;r<R;++r)for(int v=0;v<NV;++v)_mm512_store_ps(out+(r*NV+v)*16,_mm512_add_ps(b[r][v],_mm512_add_ps(f[r][v],l[r][v])));
}
// argmax first only (tropical-gemm style)
template<int R> __attribute__((noinline)) void arg1(int n){
  V b[R][NV], f[R][NV]; for(int r=0;r<R;++r)for(int v=0;v<NV;++v){b[r][v]=_mm512_set1_ps(-1e30f); f[r][v]=_mm512_setzero_ps();}
  V kv=_mm512_set1_ps(0.f), one=_mm512_set1_ps(1.f);
  for(int i=0;i<n;++i){V wv[NV]; for(int v=0;v<NV;++v) wv[v]=_mm512_load_ps(wp+i*NR+v*16);
    for(int r=0;r<R;++r){V x=_mm512_set1_ps(xs[r][i]); for(int v=0;v<NV;++v){ V c=addf(x,wv[v]);
      M gt=_mm512_cmp_ps_mask(c,b[r][v],_CMP_GT_OQ);
      b[r][v]=_mm512_max_ps(b[r][v],c); f[r][v]=_mm512_mask_mov_ps(f[r][v],gt,kv);}}
    kv=_mm512_add_ps(kv,one);}
  for(int r=0;r<R;++r)for(int v=0;v<NV;++v)_mm512_store_ps(out+(r*NV+v)*16,_mm512_add_ps(b[r][v],f[r][v]));
}
template<class F> double bench(F f, int R){ double best=1e9; for(int k=0;k<7;++k){double t0=now(); for(int it=0;it<20000;++it) f(64); double t=now()-t0; if(t<best)best=t;} return best/(20000.0*64*R*NV)*1e12; }

// MODE 3: int compare + float masked add; 4: float cmp + int masked add; 5: int cmp + int masked add
template<int R,int MODE> __attribute__((noinline)) void scan2(int n){
  __m512i acc[R][NV]; V yv[R][NV]; for(int r=0;r<R;++r)for(int v=0;v<NV;++v){acc[r][v]=_mm512_setzero_si512(); yv[r][v]=_mm512_load_ps(ys+(r*NV+v)*16);}
  __m512i kv=_mm512_set1_epi32(4096), one=_mm512_set1_epi32(1);
  for(int i=0;i<n;++i){V wv[NV]; for(int v=0;v<NV;++v) wv[v]=_mm512_load_ps(wp+i*NR+v*16);
    for(int r=0;r<R;++r){V x=_mm512_set1_ps(xs[r][i]); for(int v=0;v<NV;++v){ V c=addf(x,wv[v]);
      M e = MODE==4 ? _mm512_cmp_ps_mask(c,yv[r][v],_CMP_EQ_OQ) : _mm512_cmpeq_epi32_mask(_mm512_castps_si512(c), _mm512_castps_si512(yv[r][v]));
      if (MODE==3) acc[r][v]=_mm512_castps_si512(_mm512_mask_add_ps(_mm512_castsi512_ps(acc[r][v]),e,_mm512_castsi512_ps(acc[r][v]),_mm512_castsi512_ps(kv)));
      else acc[r][v]=_mm512_mask_add_epi32(acc[r][v],e,acc[r][v],kv);}}
    kv=_mm512_add_epi32(kv,one);}
  for(int r=0;r<R;++r)for(int v=0;v<NV;++v)_mm512_store_si512(out+(r*NV+v)*16,acc[r][v]);
}

// CB: 0 addf, 1 add, 2 alternate by v; CMP: 0 float, 1 int
template<int R,int CB,int CMP,bool PIN=false> __attribute__((noinline)) void scan3(int n){
  V acc[R][NV], yv[R][NV]; for(int r=0;r<R;++r)for(int v=0;v<NV;++v){acc[r][v]=_mm512_setzero_ps(); yv[r][v]=_mm512_load_ps(ys+(r*NV+v)*16);}
  V kv=_mm512_set1_ps(4096.f), one=_mm512_set1_ps(1.f);
  for(int i=0;i<n;++i){V wv[NV]; for(int v=0;v<NV;++v) {wv[v]=_mm512_load_ps(wp+i*NR+v*16); if (PIN) asm("" : "+v"(wv[v]));}
    for(int r=0;r<R;++r){V x=_mm512_set1_ps(xs[r][i]); for(int v=0;v<NV;++v){
      bool f = CB==0 || (CB==2 && ((r*NV+v)&1));
      V c= f ? addf(x,wv[v]) : _mm512_add_ps(x,wv[v]);
      M e= CMP ? _mm512_cmpeq_epi32_mask(_mm512_castps_si512(c), _mm512_castps_si512(yv[r][v])) : _mm512_cmp_ps_mask(c,yv[r][v],_CMP_EQ_OQ);
      acc[r][v]=_mm512_mask_add_ps(acc[r][v],e,acc[r][v],kv);}}
    kv=_mm512_add_ps(kv,one);}
  for(int r=0;r<R;++r)for(int v=0;v<NV;++v)_mm512_store_ps(out+(r*NV+v)*16,acc[r][v]);
}

// keyed: comb = int max, forward = int min of int max; scan: ieq + MODE 0 float madd, 1 int madd, 2 mask3 fma, 3 alternate 0/2
template<int R> __attribute__((noinline)) void kfwd(int n){
  __m512i acc[R][NV]; for(int r=0;r<R;++r)for(int v=0;v<NV;++v)acc[r][v]=_mm512_set1_epi32(0x7fffffff);
  for(int i=0;i<n;++i){__m512i wv[NV]; for(int v=0;v<NV;++v) wv[v]=_mm512_load_si512(wp+i*NR+v*16);
    for(int r=0;r<R;++r){__m512i x=_mm512_set1_epi32(((int*)xs[r])[i]); for(int v=0;v<NV;++v) acc[r][v]=_mm512_min_epi32(acc[r][v], _mm512_max_epi32(x,wv[v]));}}
  for(int r=0;r<R;++r)for(int v=0;v<NV;++v)_mm512_store_si512(out+(r*NV+v)*16,acc[r][v]);
}
template<int R,int MODE> __attribute__((noinline)) void kscan(int n){
  V acc[R][NV]; __m512i yv[R][NV]; for(int r=0;r<R;++r)for(int v=0;v<NV;++v){acc[r][v]=_mm512_setzero_ps(); yv[r][v]=_mm512_load_si512(ys+(r*NV+v)*16);}
  V kv=_mm512_set1_ps(4096.f), one=_mm512_set1_ps(1.f);
  for(int i=0;i<n;++i){__m512i wv[NV]; for(int v=0;v<NV;++v) wv[v]=_mm512_load_si512(wp+i*NR+v*16);
    for(int r=0;r<R;++r){__m512i x=_mm512_set1_epi32(((int*)xs[r])[i]); for(int v=0;v<NV;++v){ __m512i c=_mm512_max_epi32(x,wv[v]);
      M e=_mm512_cmpeq_epi32_mask(c,yv[r][v]);
      int m = MODE==3 ? ((r*NV+v)&1)*2 : MODE;
      if (m==0) acc[r][v]=_mm512_mask_add_ps(acc[r][v],e,acc[r][v],kv);
      else if (m==1) acc[r][v]=_mm512_castsi512_ps(_mm512_mask_add_epi32(_mm512_castps_si512(acc[r][v]),e,_mm512_castps_si512(acc[r][v]),_mm512_castps_si512(kv)));
      else acc[r][v]=_mm512_mask3_fmadd_ps(kv,one,acc[r][v],e);}}
    kv=_mm512_add_ps(kv,one);}
  for(int r=0;r<R;++r)for(int v=0;v<NV;++v)_mm512_store_ps(out+(r*NV+v)*16,acc[r][v]);
}
int main(){ for(int i=0;i<64*NR;++i) wp[i]=rand()%100; for(int r=0;r<8;++r)for(int i=0;i<64;++i) xs[r][i]=rand()%100; for(int i=0;i<8*NR;++i) ys[i]=150;
 printf("ps per output-vector per tap\n");
 printf("fwd R6 %.1f\n", bench(fwd<6>,6)); printf("fwd R4 %.1f\n", bench(fwd<4>,4));
 printf("scan R2 madd %.1f\n", bench(scan<2,0>,2)); printf("scan R2 mfma %.1f\n", bench(scan<2,1>,2)); printf("scan R2 alt %.1f\n", bench(scan<2,2>,2));
 printf("scan R3 madd %.1f\n", bench(scan<3,0>,3)); printf("scan R3 alt %.1f\n", bench(scan<3,2>,3));
 printf("scan R4 madd %.1f\n", bench(scan<4,0>,4)); printf("scan R4 alt %.1f\n", bench(scan<4,2>,4));
 printf("scan R2 icmp fadd %.1f\n", bench(scan2<2,3>,2)); printf("scan R2 fcmp iadd %.1f\n", bench(scan2<2,4>,2)); printf("scan R2 icmp iadd %.1f\n", bench(scan2<2,5>,2)); printf("scan R3 icmp iadd %.1f\n", bench(scan2<3,5>,3)); printf("scan R4 icmp iadd %.1f\n", bench(scan2<4,5>,4));
 printf("s3 add fcmp %.1f\n", bench(scan3<2,1,0>,2)); printf("s3 alt fcmp %.1f\n", bench(scan3<2,2,0>,2)); printf("s3 add icmp %.1f\n", bench(scan3<2,1,1>,2)); printf("s3 alt icmp %.1f\n", bench(scan3<2,2,1>,2)); printf("s3 R3 alt fcmp %.1f\n", bench(scan3<3,2,0>,3));printf("s3 R3 alt icmp %.1f\n", bench(scan3<3,2,1>,3));
 printf("s3 alt fcmp PIN %.1f\n", bench(scan3<2,2,0,true>,2)); printf("s3 R3 alt PIN %.1f\n", bench(scan3<3,2,0,true>,3)); printf("s3 R4 alt PIN %.1f\n", bench(scan3<4,2,0,true>,4));
 printf("kfwd R6 %.1f\n", bench(kfwd<6>,6)); for (int q=0;q<1;++q){ printf("kscan madd %.1f\n", bench(kscan<2,0>,2)); printf("kscan imadd %.1f\n", bench(kscan<2,1>,2)); printf("kscan mfma %.1f\n", bench(kscan<2,2>,2)); printf("kscan alt %.1f\n", bench(kscan<2,3>,2));}
 printf("argmax+ties R2 %.1f\n", bench(argf<2>,2)); printf("argmax-first R2 %.1f\n", bench(arg1<2>,2)); printf("argmax-first R3 %.1f\n", bench(arg1<3>,3));
}
