import Crypto

/// AES-256-GCM for link frames, sealing and opening straight into the caller's buffers.
///
/// swift-crypto's `AES.GCM` returns a fresh `Data` for every seal and open; for a 1 MiB
/// replicated write that is an allocation, page faults and a copy on each side, more than
/// the cipher itself. This calls the one-shot AEAD interface of the BoringSSL that
/// swift-crypto links (its symbols carry the `CCryptoBoringSSL_` prefix), which writes
/// ciphertext and plaintext wherever it is told. With AES-NI, VAES and carry-less multiply it
/// runs at ≈ 11 GB/s here, against ≈ 1.8 GB/s for HMAC-SHA256 with the SHA extensions
/// (docs/benchmarks.md "Frame protection").
///
/// Thread-safe: BoringSSL's AEAD context is read-only after creation.
public final class AESGCMKey: @unchecked Sendable {
    public static let keyBytes = 32
    public static let tagBytes = 16
    public static let nonceBytes = 12
    private let ctx: OpaquePointer

    public init(key: SymmetricKey) {
        precondition(key.bitCount == Self.keyBytes * 8, "AES-256-GCM takes a 256-bit key")
        let made = key.withUnsafeBytes { k in
            boringNewAEAD(boringAES256GCM(), k.baseAddress!, Self.keyBytes, Self.tagBytes)
        }
        // Fails only on a bad key length or out of memory, both programming errors here.
        guard let made else { preconditionFailure("EVP_AEAD_CTX_new refused an AES-256-GCM key") }
        ctx = made
    }

    deinit { boringFreeAEAD(ctx) }

    /// Encrypts `first` then `second` (one message, as if they were joined) into
    /// `out` (`first.count + second.count` bytes) followed by the tag (`tagBytes`).
    /// `out` may not overlap the inputs.
    public func seal(nonce: UnsafeRawBufferPointer, aad: UnsafeRawBufferPointer, _ first: UnsafeRawBufferPointer,
                     _ second: UnsafeRawBufferPointer, into out: UnsafeMutableRawPointer) {
        precondition(nonce.count == Self.nonceBytes)
        var tagLength = 0
        let rc = boringSealScatter(ctx, out, out + first.count, &tagLength, second.count + Self.tagBytes,
                                   nonce.baseAddress!, nonce.count, first.baseAddress, first.count,
                                   second.baseAddress, second.count, aad.baseAddress, aad.count)
        precondition(rc == 1 && tagLength == second.count + Self.tagBytes, "AES-GCM seal failed")
    }

    /// Decrypts `sealed` (ciphertext then tag) into `out` (`sealed.count - tagBytes` bytes,
    /// which may be `sealed` itself); false if the tag does not authenticate it, and then
    /// `out` holds nothing meaningful.
    public func open(nonce: UnsafeRawBufferPointer, aad: UnsafeRawBufferPointer, _ sealed: UnsafeRawBufferPointer,
                     into out: UnsafeMutableRawPointer) -> Bool {
        guard nonce.count == Self.nonceBytes, sealed.count >= Self.tagBytes else { return false }
        var written = 0
        let rc = boringOpen(ctx, out, &written, sealed.count - Self.tagBytes, nonce.baseAddress!, nonce.count,
                            sealed.baseAddress!, sealed.count, aad.baseAddress, aad.count)
        if rc != 1 { boringClearErrors() }  // the failure is the answer; leave no error queued
        return rc == 1 && written == sealed.count - Self.tagBytes
    }
}

// BoringSSL's AEAD interface (include/openssl/aead.h), as linked by swift-crypto.
@_silgen_name("CCryptoBoringSSL_EVP_aead_aes_256_gcm")
private func boringAES256GCM() -> OpaquePointer

@_silgen_name("CCryptoBoringSSL_EVP_AEAD_CTX_new")
private func boringNewAEAD(_ aead: OpaquePointer, _ key: UnsafeRawPointer, _ keyLength: Int, _ tagLength: Int) -> OpaquePointer?

@_silgen_name("CCryptoBoringSSL_EVP_AEAD_CTX_free")
private func boringFreeAEAD(_ ctx: OpaquePointer)

@_silgen_name("CCryptoBoringSSL_EVP_AEAD_CTX_seal_scatter")
private func boringSealScatter(_ ctx: OpaquePointer, _ out: UnsafeMutableRawPointer, _ outTag: UnsafeMutableRawPointer,
                               _ outTagLength: UnsafeMutablePointer<Int>, _ maxOutTagLength: Int,
                               _ nonce: UnsafeRawPointer, _ nonceLength: Int, _ input: UnsafeRawPointer?, _ inputLength: Int,
                               _ extraInput: UnsafeRawPointer?, _ extraInputLength: Int,
                               _ aad: UnsafeRawPointer?, _ aadLength: Int) -> Int32

@_silgen_name("CCryptoBoringSSL_EVP_AEAD_CTX_open")
private func boringOpen(_ ctx: OpaquePointer, _ out: UnsafeMutableRawPointer, _ outLength: UnsafeMutablePointer<Int>,
                        _ maxOutLength: Int, _ nonce: UnsafeRawPointer, _ nonceLength: Int,
                        _ input: UnsafeRawPointer, _ inputLength: Int, _ aad: UnsafeRawPointer?, _ aadLength: Int) -> Int32

@_silgen_name("CCryptoBoringSSL_ERR_clear_error")
private func boringClearErrors()
