// swift-tools-version:6.0
// Load generators over the product's own transport (HAShell.PeerDialer / PeerListener), in a
// separate package so the main build is untouched:
// - arbload (bench/arbitrator.sh): simulates the master of N clusters against one
//   `hamgr arbitrator`, with the product's quorum messages (Quorum.QuorumMessage);
// - linkping (bench/link-ping.sh): the round trip of one frame between two processes, and
//   the CPU of sealing and opening a frame.
import Foundation
import PackageDescription

// A path dependency's identity is its directory name: compute it, so any checkout works.
let mainPackage = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
    .deletingLastPathComponent().lastPathComponent

let package = Package(
    name: "arbload",
    platforms: [.macOS(.v13)],
    dependencies: [
        .package(path: "../.."),
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-crypto", from: "3.12.3"),
    ],
    targets: [
        .executableTarget(name: "linkping", dependencies: [
            .product(name: "HAShell", package: mainPackage),
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "Crypto", package: "swift-crypto"),
        ]),
        .executableTarget(name: "arbload", dependencies: [
            .product(name: "HAShell", package: mainPackage),
            .product(name: "Quorum", package: mainPackage),
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            .product(name: "Crypto", package: "swift-crypto"),
        ]),
    ],
    swiftLanguageModes: [.v5]
)
