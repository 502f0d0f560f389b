"""Sans-I/O codecs. Nothing in this package imports trio or touches a socket."""
