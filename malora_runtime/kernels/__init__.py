"""MALoRA delta kernels: the float64 reference, the native CPU kernel, the torch CPU path, Triton, and one
dispatch facade."""
