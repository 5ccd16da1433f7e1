"""IOMMU semantics: domains, mappings, translation, faults."""
