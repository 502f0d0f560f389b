"""Media: uploads (photos, voice, video, files), their processing, storage and safe serving.

:mod:`.service` (uploads, reads, references, collection), :mod:`.processing` and :mod:`.worker`
(what a file is, in a sandboxed process), :mod:`.backend` (``fs``) and :mod:`.s3` (``s3``) for
the bytes, :mod:`.serving` (the HTTP headers a download is answered with). docs/media.md.
"""
