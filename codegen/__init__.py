"""Code generation (Triton kernels per form); filled by the codegen issues."""
