"""The cloud side: cache logs -> replica page blobs, recovery points (snapshots), export."""
