"""The checkpoint model: what a read checkpoint is (records, storages, opaque objects) and where its state dict sits."""
