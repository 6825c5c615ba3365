"""Integrated gradients: AttAttr over attention patterns and IG along the patching path."""
