"""The prefix cache, as a package: lookup index (`index`), cache-list operations (`kv`), the cache
itself (`prefix`), the block format (`blocks`) and the block disk tier (`disk`)."""
