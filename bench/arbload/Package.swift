// swift-tools-version:6.0
// Load generator for bench/arbitrator.sh: simulates the master of N clusters against one
// `hamgr arbitrator`, over the product's own authenticated transport (HAShell.PeerDialer) and
// quorum messages (Quorum.QuorumMessage). A separate package so the main build is untouched.
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
