"""CSAEGAN: a 4x super-resolution generator for chest X-rays, with training and evaluation.

The node (``cxr_sr_node``) uses only :mod:`model.inference`. This package never imports the node.
"""
