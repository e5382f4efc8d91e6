"""Train Variational Autoencoders and export them for the vaeserve service."""
