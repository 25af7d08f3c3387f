"""Built-in ops: ``jaxconv.ops.max_plus``, ``jaxconv.ops.get("adder")``, ...

Each op's docstring gives its forward formula, gradient rule, padding default and source.
"""

from jaxconv._src.core.ops import BUILTIN_OPS as BUILTIN_OPS
from jaxconv._src.core.ops import adder as adder
from jaxconv._src.core.ops import get as get
from jaxconv._src.core.ops import l1 as l1
from jaxconv._src.core.ops import l2 as l2
from jaxconv._src.core.ops import l2_exact as l2_exact
from jaxconv._src.core.ops import log as log
from jaxconv._src.core.ops import max_min as max_min
from jaxconv._src.core.ops import max_plus as max_plus
from jaxconv._src.core.ops import max_times as max_times
from jaxconv._src.core.ops import min_max as min_max
from jaxconv._src.core.ops import min_plus as min_plus
from jaxconv._src.core.ops import names as names
from jaxconv._src.core.ops import standard as standard
from jaxconv._src.core.ops import xnor as xnor
from jaxconv._src.kernel_ops import gaussian as gaussian
from jaxconv._src.kernel_ops import polynomial as polynomial

# Every built-in op is public: the list is the built-in table's, not written out again.
__all__ = tuple(sorted({"BUILTIN_OPS", "gaussian", "get", "names", "polynomial",
                        *BUILTIN_OPS}))
