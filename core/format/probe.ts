// What QEMU 7.2's format probes (bdrv_probe_all) would take the first sector of a file for,
// for the formats whose probe looks at its content: an image probed as raw must not be
// turned into one that probes as something else by a write to its first sector (QEMU's
// raw driver refuses such writes with EPERM), or the next open would read it as that format
// and follow whatever backing file the data names.

/** Bytes of the first sector the probes look at (BLOCK_PROBE_BUF_SIZE). */
export const PROBE_SECTOR = 512;

const ascii = (b: Uint8Array, off: number, s: string) => s.split('').every((c, i) => b[off + i] === c.charCodeAt(0));
const be32 = (b: Uint8Array, off: number) => ((b[off]! << 24) | (b[off + 1]! << 16) | (b[off + 2]! << 8) | b[off + 3]!) >>> 0;
const le32 = (b: Uint8Array, off: number) => ((b[off + 3]! << 24) | (b[off + 2]! << 16) | (b[off + 1]! << 8) | b[off]!) >>> 0;

const CLOOP_MAGIC = '#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n';

/** The format QEMU would probe `sector` (the first 512 bytes) as, other than raw; null for raw. */
export function probeNonRaw(sector: Uint8Array): string | null {
  if (sector.length < PROBE_SECTOR) return null;
  if (be32(sector, 0) === 0x514649fb) {
    const version = be32(sector, 4);
    if (version >= 2) return 'qcow2';
    if (version === 1) return 'qcow';
  }
  if (le32(sector, 0) === 0x00444551) return 'qed';
  if (ascii(sector, 0, 'KDMV') || ascii(sector, 0, 'COWD')) return 'vmdk';
  if (ascii(sector, 0, 'conectix')) return 'vpc';
  if (ascii(sector, 0, 'vhdxfile')) return 'vhdx';
  if (le32(sector, 0x40) === 0xbeda107f) return 'vdi';
  if ((ascii(sector, 0, 'WithoutFreeSpace') || ascii(sector, 0, 'WithouFreSpacExt')) && le32(sector, 16) === 2) return 'parallels';
  // LUKS: magic and version 1 (qcrypto_block_luks_has_format).
  if (ascii(sector, 0, 'LUKS') && sector[4] === 0xba && sector[5] === 0xbe && sector[6] === 0 && sector[7] === 1) return 'luks';
  if (ascii(sector, 0, CLOOP_MAGIC)) return 'cloop';
  return null;
}
