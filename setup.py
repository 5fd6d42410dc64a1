"""The native data plane, ``dbmtls._native`` (docs/native.md); everything else is in pyproject.toml.

The extension is optional: without a C compiler or the OpenSSL 3 headers (Debian: ``libssl-dev``)
the build says why and goes on, and ``dataPlane: native`` falls back to the Python data plane
with a log line.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "dbmtls._native",
            sources=["src/dbmtls/native/_native.c"],
            libraries=["ssl", "crypto"],
            extra_compile_args=["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers"],
            optional=True,
        )
    ]
)
