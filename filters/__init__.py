"""Filter stages: one module, one small Stage subclass each."""
