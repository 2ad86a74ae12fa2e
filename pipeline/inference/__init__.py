"""The model folder and running it: what train writes, and what evaluate, predict and serve load.

model_folder.py (the folder's files, its preprocessing contract, Keras in safe mode),
classifier.py (a loaded folder, its engine, LiteRT or Keras, and its predictions),
engines.py (one runner per export format: LiteRT int8, onnxruntime, OpenVINO, SavedModel),
converters.py (a Keras model into each export format).
Imports pipeline.core and data.
"""
