# Builds native/build/Release/strata_native.node (driven by scripts/build-native.mjs).
# Plain C over N-API only, so the binary does not depend on the Node/Electron ABI.
{
  "targets": [
    {
      "target_name": "strata_native",
      "sources": ["strata_native.c"],
      "defines": ["NAPI_VERSION=4", "_GNU_SOURCE", "_FILE_OFFSET_BITS=64"],
      "cflags": ["-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter", "-fvisibility=hidden"],
      "xcode_settings": {
        "OTHER_CFLAGS": ["-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"]
      }
    }
  ]
}
