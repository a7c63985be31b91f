"""MALoRA delta kernels: the float64 reference, the CPU path, Triton, and one dispatch facade."""
