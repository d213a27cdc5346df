"""tomoml_nb: machine learning for synchrotron tomography, one notebook per method.

Each method lives in its own module (``tomo``, ``segment``, ``dvc`` ...) and is taught
in ``notebooks/NN_method.ipynb`` beside the classical baseline users already know.

Examples
--------
>>> import tomoml_nb
>>> tomoml_nb.__version__
'0.1.0'
"""
__version__ = "0.1.0"

__all__ = ["__version__"]
