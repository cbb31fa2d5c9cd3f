"""SoftFiNE: fine-grained Chinese NER with hierarchical soft labels and entity augmentation.

Yang et al., "Exploiting Hierarchically Structured Categories in Fine-grained Chinese Named
Entity Recognition", ACL 2023. This package holds the data readers, the label space and its
soft targets, the model, the losses, the training loop and the CLI. It never imports ray.
"""

__version__ = "0.1.0"
