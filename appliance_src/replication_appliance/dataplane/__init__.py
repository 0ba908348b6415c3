"""The data path's pure logic: the 9443 frame codec, per-connection validation, and the
segment format (compress + encrypt) shared by the process server and the apply step."""
