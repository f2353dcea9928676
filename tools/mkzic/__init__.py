"""mkzic: build ZICs (partitioned-container images) as OCI bundles and OCI image archives.

Python API (what the CLI uses, and what tests call to make fixtures)::

    from tools.mkzic import Description, BootDescription, assemble, build_image_archive, \
        parse_image_name, runtime_spec, write_archive, write_bundle

    zic = assemble(Description(known=BootDescription(os_var="baremetal",
                   starting_vaddress="0x70000000", memory=16, vcpus=1)),
                   {"inmate": Path("hello.bin")})
    write_bundle(Path("out/hello"), zic, runtime_spec(zic, hostname="hello"))
    write_archive(Path("out/hello.tar"), build_image_archive(zic, parse_image_name("hello")))
"""

from tools.mkzic.boot import BootDescription, Description, VcpuPin, decode_description, encode_description
from tools.mkzic.bundle import Resources, runtime_spec, write_bundle
from tools.mkzic.errors import MkzicError
from tools.mkzic.image import ImageArchive, build_image_archive, write_archive
from tools.mkzic.names import ImageName, parse_image_name
from tools.mkzic.zic import ZicContents, assemble

__all__ = [
    "BootDescription",
    "Description",
    "ImageArchive",
    "ImageName",
    "MkzicError",
    "Resources",
    "VcpuPin",
    "ZicContents",
    "assemble",
    "build_image_archive",
    "decode_description",
    "encode_description",
    "parse_image_name",
    "runtime_spec",
    "write_archive",
    "write_bundle",
]
