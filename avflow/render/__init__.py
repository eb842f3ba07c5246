"""The render stage: expression codes and head poses -> images and videos.

raster.py       the z-buffer rasterizer (DRTK on CUDA when installed), Lambert-shaded and textured drawing
procedural.py   the demo's procedural head and user TorchScript mesh decoders
codec_avatar.py the released 50h subject's Codec Avatar (face decoder, mesh, camera)
obj.py          Wavefront OBJ meshes
video.py        .mp4 writing with the audio muxed in
plots.py        figures of a sample (mel, mouth controls, head pose) for generate and training
"""

from avflow.render.codec_avatar import AvatarError, CodecAvatar
from avflow.render.obj import TexturedMesh, load_obj, load_textured_obj
from avflow.render.procedural import FaceDecoder, ProceduralFaceDecoder, load_face_decoder, quaternion_to_matrix
from avflow.render.raster import Camera, interpolate, rasterize, render_mesh, render_textured
from avflow.render.video import VideoWriter, side_by_side, write_video

__all__ = ["AvatarError", "Camera", "CodecAvatar", "FaceDecoder", "ProceduralFaceDecoder", "TexturedMesh",
           "VideoWriter", "interpolate", "load_face_decoder", "load_obj", "load_textured_obj", "quaternion_to_matrix",
           "rasterize", "render_mesh", "render_textured", "side_by_side", "write_video"]
