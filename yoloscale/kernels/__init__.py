"""Hand-written GPU kernels (Triton) for the memory-bound part of the training step; each module has one kernel
family, its autograd Function, the module that uses it and the function that puts it into a model."""
