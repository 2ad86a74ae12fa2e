"""The model folder and running it: what train writes, and what evaluate, predict and serve load.

model_folder.py (the folder's files, its preprocessing contract, Keras in safe mode),
classifier.py (a loaded folder, its engine, LiteRT or Keras, and its predictions).
Imports pipeline.core and data.
"""
