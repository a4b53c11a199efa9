#if canImport(Glibc)
import Glibc
#endif

// SwiftPM links an executable's own entry point over libFuzzer's main, so start libFuzzer's
// driver from here (LLVMFuzzerRunDriver is libFuzzer's documented embedding API).
@_silgen_name("LLVMFuzzerRunDriver")
func LLVMFuzzerRunDriver(
    _ argc: UnsafeMutablePointer<CInt>,
    _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>>,
    _ callback: @convention(c) (UnsafePointer<UInt8>, Int) -> CInt) -> CInt

var argc = CommandLine.argc
var argv = CommandLine.unsafeArgv
exit(LLVMFuzzerRunDriver(&argc, &argv, nbdDecoderFuzz))
