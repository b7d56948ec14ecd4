"""make_shards: raw ImageNet -> WebDataset shards (+ DALI indices, manifest, stats)."""
