"""tomoml_nb: machine learning for synchrotron tomography, one notebook per method.

Each method lives in its own module (``tomo``, ``segment``, ``dvc`` ...) and is taught
in ``notebooks/NN_method.ipynb`` beside the classical baseline users already know.

Examples
--------
>>> import tomoml_nb
>>> tomoml_nb.__version__
'0.1.0'
"""
import os as _os

__version__ = "0.1.0"

# On shared CPUs (a beamline workstation, a workshop laptop running several kernels, CI) OpenMP
# threads that spin while they wait make torch many times slower as soon as other processes
# compete for the cores (measured on a loaded 2-core machine: 20 U-Net steps took 55 s with
# spinning threads, 2.5 s with passive waiting). Passive waiting costs little on an idle
# machine. It takes effect when tomoml_nb is imported before torch; an explicit
# OMP_WAIT_POLICY in the environment wins. See also ``train.limit_cpu_threads``.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__all__ = ["__version__"]
