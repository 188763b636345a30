"""Reading image data: sources, the one decoder, splits, the tensor cache, loaders, the audit."""
