"""The test S3 server itself: a real object store that takes writes and gives them back."""

import uuid


def test_s3_server_round_trip(s3_server):
    fs = s3_server.fs()
    key = f"{s3_server.uri('selftest')[len('s3://') :]}/{uuid.uuid4().hex}.json"
    with fs.open_output_stream(key) as out:
        out.write(b'{"ok": true}')
    with fs.open_input_stream(key) as stream:
        assert stream.read() == b'{"ok": true}'
    fs.delete_file(key)
