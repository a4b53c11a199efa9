// swift-tools-version:6.0
// libFuzzer targets for hamgr's pure decoders. A separate package so that the main build
// never sees -sanitize=fuzzer. Build and run with fuzz/run.sh (see docs/nbd.md "Fuzzing").
import Foundation
import PackageDescription

// A path dependency's identity is its directory name: compute it, so any checkout works.
let mainPackage = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().lastPathComponent

let package = Package(
    name: "hamgr-fuzz",
    dependencies: [
        .package(path: ".."),
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-crypto", from: "3.12.3"),
    ],
    targets: [
        .executableTarget(name: "NBDDecoderFuzz", dependencies: [
            .product(name: "Replication", package: mainPackage),
            .product(name: "NIOCore", package: "swift-nio"),
        ]),
        .executableTarget(name: "FrameFuzz", dependencies: [
            .product(name: "HACore", package: mainPackage),
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "Crypto", package: "swift-crypto"),
        ]),
    ],
    swiftLanguageModes: [.v5]
)
