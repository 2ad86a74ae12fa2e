"""The training machinery: the network, its schedule, the batches, the fit, where it runs.

model.py (the CIFAR-style CNN and nothing else), schedule.py (one-cycle and the range
test), precision.py (float32, mixed bfloat16 or float16), batches.py (the tf.data stream
and class weights, shared by both training paths), fit.py (Keras fit with early stopping),
replicated.py (the custom step for several GPUs or TF_CONFIG workers), distribute.py (the
strategy, the cluster and its collectives), callbacks.py (progress and TensorBoard),
lr_find.py (`train --find-lr`). Imports pipeline.core, data, inference and report.
"""
