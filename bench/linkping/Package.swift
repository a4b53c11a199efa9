// swift-tools-version:6.0
// Link ping-pong for bench/link-ping.sh: the round trip of one authenticated frame between two
// processes through the product's own peer transport (HAShell.PeerListener / PeerDialer /
// PeerConnection.send). A separate package so the main build is untouched.
import Foundation
import PackageDescription

// A path dependency's identity is its directory name: compute it, so any checkout works.
let mainPackage = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
    .deletingLastPathComponent().lastPathComponent

let package = Package(
    name: "linkping",
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
    ],
    swiftLanguageModes: [.v5]
)
