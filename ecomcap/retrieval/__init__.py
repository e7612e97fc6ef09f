"""The second job: product retrieval (text -> image+text) and same-product matching."""
