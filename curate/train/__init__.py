"""The bundled trainer: SFT cold start and HDPO."""
