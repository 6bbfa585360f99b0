plugins {
    id("com.android.application")
    id("org.jetbrains.kotlin.android")
}

android {
    namespace = "org.mbquant.demo"
    compileSdk = 34

    defaultConfig {
        applicationId = "org.mbquant.demo"
        minSdk = 23            // ExecuTorch's Android AAR requires API 23 or newer
        targetSdk = 34
        versionCode = 1
        versionName = "1.0"
        ndk { abiFilters += listOf("arm64-v8a") }
    }
    buildTypes {
        release { isMinifyEnabled = false }
    }
    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
    kotlinOptions { jvmTarget = "17" }
}

dependencies {
    // ExecuTorch's Java/Kotlin API and runtime with the XNNPACK backend (Module, Tensor, EValue). Use the version of
    // the executorch wheel that wrote model.pte (mbquant pins executorch 1.5.1): a runtime older than the program may
    // refuse it.
    implementation("org.pytorch:executorch-android:1.5.1")
    implementation("androidx.appcompat:appcompat:1.7.0")
    implementation("androidx.activity:activity-ktx:1.9.2")
}
