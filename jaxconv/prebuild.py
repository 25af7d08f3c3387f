"""``python -m jaxconv.prebuild MODULE[:NAME] ...``: compiles user ops' native kernels into the
kernel cache ahead of time (see `jaxconv.compile_kernels` and the README's "Kernel cache")."""

import sys

from jaxconv._src.prebuild import main

if __name__ == "__main__":
    sys.exit(main())
