"""pipeline: a folder of class-named image folders in, a trained image classifier out."""

__version__ = "0.1.0"
