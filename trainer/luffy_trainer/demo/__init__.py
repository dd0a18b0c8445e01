"""The demo: a tiny model built offline (`tiny`), a generated reasoning task (`tasks`) and `luffy quickstart`
(`quickstart`), apart from the production modules; tests and benchmarks use them too."""
