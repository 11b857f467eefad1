"""The edge side: model store, executor pool, sessions, load reporting."""
