"""mkzic: build ZICs (partitioned-container images) as OCI bundles and OCI image archives.

Installed from the wheel the package is ``runphi_mkzic`` (command ``runphi-mkzic``); in the
checkout it is ``tools.mkzic``, so its modules import each other relatively.

Python API (what the CLI uses, and what tests call to make fixtures)::

    from tools.mkzic import Description, BootDescriptionFile, assemble, build_image_archive, \
        parse_image_name, runtime_spec, write_archive, write_bundle

    zic = assemble(Description(known=BootDescriptionFile(os_var="baremetal",
                   starting_vaddress="0x70000000", memory=16, vcpus=1)),
                   {"inmate": Path("hello.bin")})
    write_bundle(Path("out/hello"), zic, runtime_spec(zic, hostname="hello"))
    write_archive(Path("out/hello.tar"), build_image_archive(zic, parse_image_name("hello")))

The boot description's schema is runphi's (``runphi.image.BootDescriptionFile``, also
exported as ``BootDescription``, the name this API used before it was shared).
"""

from .boot import BootDescription, BootDescriptionFile, Description, VcpuPin, decode_description, encode_description
from .bundle import Resources, runtime_spec, write_bundle
from .errors import MkzicError
from .image import ImageArchive, build_image_archive, write_archive
from .names import ImageName, parse_image_name
from .zic import ZicContents, assemble

__all__ = [
    "BootDescription",
    "BootDescriptionFile",
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
