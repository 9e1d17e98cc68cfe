"""Training glue: the only subpackage that imports Lightning or Hydra."""
