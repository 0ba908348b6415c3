"""The process server: the data port (9443), the journal on the cache disk, back-pressure,
and the uploader that compresses, encrypts and ships sealed segments to cache storage."""
