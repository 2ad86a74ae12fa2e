"""The model folder and running it: what train writes, and what evaluate, predict and serve load.

model_folder.py (the folder's files, its preprocessing contract, Keras in safe mode),
classifier.py (a loaded folder, its engine and calibration, and its predictions),
calibration.py (the temperature, ECE, NLL, thresholds for a target accuracy), gradcam.py
(heatmaps of where the model looked), engines.py (one runner per model file: LiteRT,
LiteRT int8, onnxruntime, OpenVINO, SavedModel), converters.py (a Keras model into each
export format). Imports pipeline.core and data.
"""
