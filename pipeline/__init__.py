"""pipeline: a folder of class-named image folders in, a trained image classifier out."""

import os

# TensorFlow's C++ start-up chatter would bury our one-line messages; real errors still show.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

__version__ = "0.1.0"
