"""`kwollect migrate`: copy a Kwollect 1.x database into this project's storage."""
