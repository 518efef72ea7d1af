// qcow2's legacy AES encryption (crypt_method 1, QEMU's "qcow" crypto format): AES-128-CBC over
// each 512-byte sector, the IV the sector's number (plain64: little-endian, zero-padded to 16
// bytes), the key the secret's bytes up to its first NUL, copied into 16 zeroed bytes (cut at 16).
// qcow2 numbers the sectors by guest offset, so a cluster keeps its ciphertext wherever it lies
// in the file. LUKS (crypt_method 2) is in luks.ts.
import { crypto } from '../codec/builtins';

export const AES_SECTOR = 512;

export class AesCipher {
  /** The IV comes from the guest offset (LUKS's from the host offset). */
  readonly physical = false;
  private readonly key: Buffer;

  /** `secret`: the secret's bytes (QEMU reads it as a C string: it ends at a NUL). */
  constructor(secret: Buffer) {
    this.key = Buffer.alloc(16);
    const nul = secret.indexOf(0);
    secret.subarray(0, Math.min(nul < 0 ? secret.length : nul, 16)).copy(this.key);
  }

  /** Encrypts `buf` (whole sectors) in place; `guestOffset` is its first sector's guest offset. */
  encrypt(buf: Uint8Array, guestOffset: number): void {
    checkWhole(buf, guestOffset);
    // CBC encryption chains block to block: one cipher per sector, its IV the sector's number.
    const iv = Buffer.alloc(16);
    let sector = BigInt(guestOffset / AES_SECTOR);
    for (let p = 0; p < buf.length; p += AES_SECTOR, sector++) {
      iv.writeBigUInt64LE(sector & 0xffff_ffff_ffff_ffffn, 0);
      const c = crypto().createCipheriv('aes-128-cbc', this.key, iv);
      c.setAutoPadding(false);
      const piece = buf.subarray(p, p + AES_SECTOR);
      const out = c.update(piece);
      c.final();
      piece.set(out);
    }
  }

  /**
   * Decrypts `buf` (whole sectors) in place. CBC decryption needs no chaining: every block is
   * decrypted at once (ECB), then XORed with the block before it, or the sector's IV.
   */
  decrypt(buf: Uint8Array, guestOffset: number): void {
    checkWhole(buf, guestOffset);
    if (buf.length === 0) return;
    const d = crypto().createDecipheriv('aes-128-ecb', this.key, null);
    d.setAutoPadding(false);
    const plain = Buffer.concat([d.update(buf), d.final()]);
    let sector = BigInt(guestOffset / AES_SECTOR);
    const iv = Buffer.alloc(16);
    for (let p = 0; p < buf.length; p += AES_SECTOR, sector++) {
      iv.writeBigUInt64LE(sector & 0xffff_ffff_ffff_ffffn, 0);
      for (let i = 0; i < 16; i++) plain[p + i]! ^= iv[i]!;
      for (let i = p + 16; i < p + AES_SECTOR; i++) plain[i]! ^= buf[i - 16]!;
    }
    buf.set(plain);
  }
}

function checkWhole(buf: Uint8Array, guestOffset: number): void {
  if (guestOffset % AES_SECTOR !== 0 || buf.length % AES_SECTOR !== 0) {
    throw new RangeError(`AES sectors must be whole: ${buf.length} bytes at guest offset ${guestOffset}`);
  }
}
