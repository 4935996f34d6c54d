"""cxr-sr-node: a DICOM node that returns 4x super-resolved chest X-rays as derived series.

The receive path (SCP, spool) never imports torch; only the worker loads ``model.inference``.
"""

__version__ = "0.1.0"
