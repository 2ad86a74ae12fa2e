"""The training machinery: the network, its schedule, the batches, the fit, where it runs.

model.py (the CIFAR-style CNN and nothing else), schedule.py (one-cycle and the range
test), precision.py (float32, mixed bfloat16 or float16), batches.py (the tf.data stream
and class weights, shared by both training paths), fit.py (Keras fit with early stopping),
replicated.py (the custom step for several GPUs or TF_CONFIG workers), distribute.py (the
strategy, the cluster and its collectives), checkpoints.py (a checkpoint every epoch,
`train --resume`), callbacks.py (progress and TensorBoard), lr_find.py (`train
--find-lr`), out_of_fold.py (audit's K models, each predicting the fold it never saw).
Imports pipeline.core, data, inference and report.
"""
