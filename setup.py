"""Only the optional C helper lives here; everything else is in pyproject.toml.

The extension is optional: where it cannot be built (no compiler), stager copies with memcpy.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "stager.client.hook._streamcopy", ["client/hook/_streamcopy.c"], optional=True, extra_compile_args=["-O2"]
        )
    ]
)
