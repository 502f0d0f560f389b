"""What cluster processes share to talk to each other: the inter-process links (shards, API
servers, presence servers). The frames they carry are catalogued in
:mod:`chatd.protocol.link_frames`, framed by :mod:`chatd.protocol.link`."""
